"""Throwaway local services for tests, benchmarks and `make up`: each module starts one real
server as a subprocess on a free loopback port, waits until it answers, and stops it.

  s3   an S3 HTTP server (a `minio` binary if one is on PATH, else moto's server mode)
"""
