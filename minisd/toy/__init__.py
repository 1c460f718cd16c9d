"""An offline toy world for text-to-image: procedural scenes of one or two coloured shapes with their captions
(world.py, captions.py), written as a data set (dataset.py), and a pixel checker that judges an image against
its caption with no network (checker.py). Command line: `python -m minisd.toy data|check` (__main__.py)."""
