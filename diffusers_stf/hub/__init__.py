"""The Hub: saved folders that plain diffusers loads, and uploads. The bottom layer: it imports nothing else from the
package; the pipelines layer passes it the classes it bundles and loads.

- ``bundle.py``: classes → one self-contained module (the bundler; its rules are in its docstring), reading the
  package's source through ``source.py``;
- ``layout.py``: the folder: content-addressed code files, ``model_index.json`` and ``config.json``'s ``auto_map``,
  and the view through which the package loads a folder with its own classes;
- ``mixin.py``: ``RemoteCodeMixin``, the ``save_pretrained``/``from_pretrained`` of the package's pipelines;
- ``push.py``: uploads (token and repo-id checks, early repo creation, upload or explain, the retry command).
"""

from .bundle import generate_remote_code
from .layout import content_addressed, write_model_remote_code, write_remote_code
from .mixin import RemoteCodeMixin
