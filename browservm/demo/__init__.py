"""The demo provider's server side: a local OAuth 2.0 authorization server (:mod:`browservm.demo.oauth`)."""
