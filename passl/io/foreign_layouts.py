"""Weights laid out by other toolkits (PASSL v1), read by this layer and renamed by the model
layer that knows our layer names.

The model layer registers each layout here (``passl/models/passl_v1.py``), so the checkpoint
and weights readers of ``passl/io`` accept such files without importing the models they
rename into. A layout is an object with:

- ``recognise(obj, what)``: a file object (with ``epoch``) when ``obj``, as the file reader
  returned it, is in this layout, else None (``what`` names the file in messages);
- ``model_state(file, expected=None)`` and ``backbone_state(file)``: ``(state dict in our
  names, one line saying what was recognised and mapped)``.
"""

LAYOUTS = []


def register_layout(layout):
    """Add ``layout`` to those the readers try (in registration order)."""
    LAYOUTS.append(layout)
    return layout


def recognise(obj, what):
    """``(layout, file)`` for the first registered layout that recognises ``obj``, else
    ``(None, None)``."""
    for layout in LAYOUTS:
        found = layout.recognise(obj, what)
        if found is not None:
            return layout, found
    return None, None
