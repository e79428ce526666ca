"""SHA-256 of a file, read in chunks: bundles' manifests, runs' records of what they trained on."""
import hashlib


def sha256_of(path, chunk_bytes=1 << 20):
    """Hex SHA-256 of the file at ``path`` (read ``chunk_bytes`` at a time, so any size fits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
