"""The documentation site: its pages (Markdown) and the hooks that generate parts of them."""
