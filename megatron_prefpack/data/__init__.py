"""Prompt-shared packed rows: records -> tokenized groups -> rows with layout metadata."""
