"""archiver: turns "zip these S3 objects" requests from SQS into ZIP archives in S3."""

__version__ = "0.1.0"
