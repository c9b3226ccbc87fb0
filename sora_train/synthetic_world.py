"""The synthetic world's vocabulary: colours, backgrounds, shapes, motions and the held-out pairs. One module for
the generator that draws it (data_tools/synthetic.py) and the evaluator that scores it (sora_train/inference/evaluate.py)."""

COLOURS = {
    "red": (230, 30, 30),
    "yellow": (235, 215, 30),
    "green": (30, 200, 60),
    "cyan": (30, 210, 220),
    "blue": (40, 70, 235),
    "magenta": (220, 40, 210),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (245, 245, 245), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "triangle", "heart")
MOTIONS = ("left", "right", "up", "down", "beating")

# (colour, shape) pairs never generated for training: evaluation asks for them to test that
# the model composes attributes rather than memorising captions.
HELDOUT_PAIRS = frozenset({("red", "circle"), ("blue", "heart"), ("green", "triangle"), ("yellow", "square")})
