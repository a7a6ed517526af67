"""Uploaded files (the Files API): streamed to disk, checked, recorded; jobs train on them."""
