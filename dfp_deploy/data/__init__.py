"""Model inputs: image files read and normalised (images), BN-matched synthetic inputs (synthetic), and the inputs a
build's stages share, loaded once (sources). Import the submodules directly; this package imports nothing heavy."""
