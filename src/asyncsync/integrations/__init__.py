"""In-process integrations with training frameworks (they import nothing until used)."""
