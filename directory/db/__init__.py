"""The directory's database: the engine and its migrations, the tables, the stores (SQL)."""
