"""The seam to the object store: the `ObjectStore` Protocol and its S3 and file://
implementations."""
