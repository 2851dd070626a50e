"""Data formats, chat templates and the Ray Data preprocessing job."""
