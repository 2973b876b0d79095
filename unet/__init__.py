"""The U-Net: data generator, model, losses, metrics, bundle, training."""

import os
import re
import sys
import tempfile

# TensorFlow's C++ start-up messages (oneDNN, CPU features) are noise for users; a user's setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Lines TensorFlow's C++ side writes at import whatever TF_CPP_MIN_LOG_LEVEL says.
_IMPORT_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|I0000 .*\] oneDNN custom operations)"
)


def without_import_noise(text: str) -> list[str]:
    """The non-empty lines of ``text`` that are not TensorFlow's known start-up noise."""
    return [line for line in text.splitlines() if line.strip() and not _IMPORT_NOISE.match(line)]


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its start-up noise filtered out of stderr; anything else it writes is kept."""
    saved = None
    if "tensorflow" not in sys.modules and os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0":
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no real stderr (embedded interpreters): import as is
            pass
    if saved is None:
        import tensorflow

        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = without_import_noise(caught.read().decode(errors="replace"))
            if kept:
                print("\n".join(kept), file=sys.stderr)


_import_tensorflow_quietly()
