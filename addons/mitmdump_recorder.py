"""Load hoptrace's recorder into plain mitmproxy.

    mitmdump -s addons/mitmdump_recorder.py --set hoptrace_db=traces.db \
        --mode reverse:http://127.0.0.1:3001@127.0.0.1:13001 --set hoptrace_service=auth@13001

mitmproxy loads a script as a top-level module with its folder first on sys.path,
so relative imports cannot work here: the recorder comes from the installed package.
`hoptrace addon-path` prints this file's location.
"""

from hoptrace.addons.recorder import Recorder
from hoptrace.addons.upstream_timeout import UpstreamTimeout

addons = [Recorder(source="mitmdump -s"), UpstreamTimeout()]
