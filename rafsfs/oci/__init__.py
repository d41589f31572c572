"""OCI images: references, the distribution API client, the Nydus image shape, convert and pull."""
