"""The ``s3`` command line: a thin layer over the Python API."""
