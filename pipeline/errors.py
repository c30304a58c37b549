"""The errors a user can act on. Each message names the thing at fault and the fix.

`PipelineError` is their base: the CLI prints any of them as one line. `ImageError` marks the
ones a single image can cause (undecodable, unknown or too many labels): a worker records that
image as failed and goes on, while any other exception fails the shard loudly."""


class PipelineError(Exception):
    """A problem with the user's input, config, files or model: the message says the fix."""


class ImageError(PipelineError):
    """One image cannot be segmented; the rest of its shard can."""


class ModelLoadError(PipelineError, RuntimeError):
    """The model could not be found or loaded; the message names it and the fix."""


class DeviceError(PipelineError):
    """The device asked for cannot run the model here; the message names it and the fix."""
