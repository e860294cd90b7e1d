"""Reading TensorBoard event files back in tests, with TensorBoard's own reader (which applies the
purge a resumed run's first event asks for, as the TensorBoard UI does)."""

from pathlib import Path


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard run folder: its (step, value) points as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def steps(directory: Path) -> dict[str, list[int]]:
    """{tag: [steps]} of a run folder."""
    return {tag: [step for step, _ in points] for tag, points in scalars(directory).items()}


TRAINING_TAGS = ["train/loss", "train/accuracy", "train/grad_norm", "train/learning_rate", "val/nll",
                 "val/unseen_accuracy"]
