"""Files in and out: visit folders and labels, image decoding, atomic writers, names as shown, and what
cervscan may write in an output folder. No torch import.

Each concern is its own module; the names other packages use are gathered here.
"""

from cervscan.files.atomic import (  # noqa: F401
    atomic_write_bytes,
    atomic_write_npz,
    atomic_write_with,
    atomic_write_csv,
    atomic_write_image,
    atomic_write_json,
    atomic_write_text,
    csv_bytes,
)
from cervscan.files.names import (  # noqa: F401
    MAX_NAME_BYTES,
    clean_text,
    display_id,
    from_display_id,
    output_stems,
    safe_name,
)
from cervscan.files.ledger import (  # noqa: F401
    LEDGER_NAME,
    OutputConflictError,
    OutputLedger,
    STATE_DIR,
    TEMP_RE,
    check_overlap,
    overlap_note,
)
from cervscan.files.labels import (  # noqa: F401
    read_labels,
)
from cervscan.files.visits import (  # noqa: F401
    IMAGE_EXTS,
    Visit,
    discover_visits,
)
from cervscan.files.cache import (  # noqa: F401
    cache_root,
    file_key,
)
from cervscan.files.decode import (  # noqa: F401
    DecodedImage,
    MAX_DECODE_MB,
    decode_bytes,
    read_image,
)
