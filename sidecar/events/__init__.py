"""The one event model of the runtime link (schema.py), its decoding (decode.py, reader.py), what it looks like
from outside (contract.py), and the intake every channel hands its batches to (intake.py)."""
