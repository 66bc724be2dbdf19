"""The model files, installed as `viscpm.modeling` and copied into converted folders as Hub remote code.

Every file here imports transformers. Importing it first, here, lets `import viscpm`'s registration with the Auto
classes (which runs when transformers is first imported, and imports all these files) run before any of them starts
loading, instead of in the middle of one.
"""

import transformers  # noqa: F401
