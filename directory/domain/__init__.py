"""The directory's pure core: rules decided from data, never awaiting, never reading the clock
(they take ``now``), never touching a socket or a database."""
