"""MONAI Label app serving the VESSA bundles: MONAI Label's ``monaibundle`` sample app, with failed inference requests
answered by an HTTP error that says why.

MONAI Label (0.8) has no error handler of its own: an exception in a bundle's inference becomes a bare
``500 Internal Server Error`` and the reason stays in the server's log. Here a request for an image the studies folder
does not hold gives 404, an input the bundle rejects (corrupt or truncated upload, wrong dimension; the bundle's
``CheckImageFiled`` names the file and the problem) gives 422, anything else 500, each with the reason as the JSON
``detail``; the server keeps serving.

``docs/run_monailabel.sh`` builds the app folder: the sample app's files, its ``main.py`` renamed
``monaibundle_main.py``, and this file as ``main.py``.
"""

from __future__ import annotations

import logging
import os

import monaibundle_main  # the sample app's main.py, next to this file (MONAI Label puts the app folder on sys.path)
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from vessa_components.data.errors import DataError

logger = logging.getLogger(__name__)


def _reason_and_status(error: BaseException) -> tuple[str, int]:
    """The message of an exception chain that says what is wrong (MONAI wraps a transform's error in its own) and its
    HTTP status: the bundle's own :class:`DataError` (it names the file and the problem) if there is one, otherwise
    the innermost message."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    status = 500
    if any(isinstance(e, FileNotFoundError) for e in chain):
        status = 404
    elif any(isinstance(e, (ValueError, TypeError)) for e in chain):
        status = 422
    reason = next((e for e in chain if isinstance(e, DataError)), None)
    reason = reason or next((e for e in reversed(chain) if str(e)), chain[0])
    return f"{type(reason).__name__}: {reason}", status


# MONAILabelApp must be a direct base: MONAI Label looks for a class of main.py whose bases name it, and this module
# holds no other (the sample app's class stays inside monaibundle_main).
class VessaBundleApp(monaibundle_main.MyApp, MONAILabelApp):
    """The ``monaibundle`` sample app (bundles under ``model/``, ``--conf models``), with reasons for failed requests."""

    def infer(self, request, datastore=None):
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            store = datastore if datastore else self.datastore()
            if not store.get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"image '{image}' is not in the studies folder")
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except Exception as e:
            reason, status = _reason_and_status(e)
            logger.error(f"inference request for '{request.get('model')}' failed: {reason}")
            raise HTTPException(status_code=status, detail=reason) from e
