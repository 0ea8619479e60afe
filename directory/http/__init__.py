"""The directory's HTTP edge: the routes by audience, the edge that checks callers and
builds every response, the views, the OpenAPI document, the HTTP server's tuning."""
