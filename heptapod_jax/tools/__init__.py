"""Command-line tools: checkpoint import (convert_tokenizer), export, inspection."""
