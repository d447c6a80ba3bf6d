"""Reading DICOM files, bounded, into header facts, decoded pixels and display values.

One module per step, lowest first: ``tags`` (one attribute, safely), ``io`` (bounded reading and
:class:`~workbench.dicom.read.io.UnreadableDicomError`), ``header`` (header facts), ``display``
(the display pipeline), ``hounsfield`` (CT values in HU), ``pixels`` (decoding: ``read_image``)
and ``geometry`` (whether a series stacks into a volume). Import from the module itself: this
package re-exports nothing.
"""
