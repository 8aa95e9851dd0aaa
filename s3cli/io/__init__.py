"""Reading videos, frame folders and masks; writing results atomically."""
