from hoptrace.cli import main

main()
