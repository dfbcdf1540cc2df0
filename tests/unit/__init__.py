"""Unit tests, in one process and none marked slow: one file per module tested, in folders that mirror trainer/
(data, model, runtime) and tools/ (tools); trainer's top-level modules here."""
