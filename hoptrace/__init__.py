"""hoptrace: find what breaks between microservices, from the traffic between them."""

__version__ = "0.1.0"
