"""Every path the platform reads or writes, local or ``s3://``/``gs://`` alike (pyarrow filesystems).

Data inputs, ``output_dir`` (shards, stats, plots, exported models), Ray Train/Tune storage and the registry
all go through these functions, so a URI behaves like a local directory. Nothing a reader finds is half-written:
files are written whole or not at all (:mod:`aigc.storage.files`), and an exported directory is published whole
(:mod:`aigc.storage.dirs`: a rename locally, a completion marker written last on object stores).
"""

from aigc.storage.dirs import completion_marker, is_complete, replace_dir
from aigc.storage.files import (
    copy_dir,
    create_exclusive,
    exists,
    filesystem,
    filesystem_for_ray,
    is_dir,
    is_file,
    is_uri,
    join,
    list_dirs,
    list_files,
    local_dir,
    local_staging,
    makedirs,
    read_bytes,
    read_json,
    read_text,
    remove_tree,
    resolve,
    write_bytes,
    write_json,
    write_text,
)

__all__ = [
    "completion_marker",
    "copy_dir",
    "create_exclusive",
    "exists",
    "filesystem",
    "filesystem_for_ray",
    "is_complete",
    "is_dir",
    "is_file",
    "is_uri",
    "join",
    "list_dirs",
    "list_files",
    "local_dir",
    "local_staging",
    "makedirs",
    "read_bytes",
    "read_json",
    "read_text",
    "remove_tree",
    "replace_dir",
    "resolve",
    "write_bytes",
    "write_json",
    "write_text",
]
