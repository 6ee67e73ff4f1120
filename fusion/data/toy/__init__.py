"""`fusion-data toy`: an offline toy world of coloured shapes, as ready-made shards.

    fusion-data toy --output data/toy --seed 0
    fusion-data toy --output /tmp/toy --image-size 64 --n-video 100 --samples-per-shard 200

The world: filled circles, squares and triangles in six fixed colours on a dark grey background,
1-4 objects per scene, never overlapping (so counts are unambiguous). Everything is procedural;
nothing is downloaded. Under `--output DIR`:

    DIR/text/                     modality text:  captions, event sentences, facts, and
                                  "DESCRIPTION Q: QUESTION A: ANSWER" lines with the VQA templates
    DIR/image/                    modality image: KEY.png (lossless) + KEY.txt + KEY.json
    DIR/video/                    modality video: KEY.mp4 (H.264) + KEY.txt + KEY.json
    DIR/vqa_image_train/          modality vqa:   KEY.png + KEY.json {question, answer, choices, type}
                                  [+ turns: the same picture's conversation, with --vqa-turns N > 1]
    DIR/vqa_image_test/           same questions, seen colour-shape pairs only
    DIR/vqa_image_compositional/  questions about colour-shape pairs held out of every training split
    DIR/vqa_video_train/          KEY.mp4 + KEY.json, type `direction`
    DIR/vqa_video_test/
    DIR/toy.json                  manifest: seed, settings, held-out pairs, counts per split and type

Each dataset directory is a shard directory (docs/shards.md) (NNNNNN.tar, NNNNNN_stats.json, index.json).

Question templates and choices are fixed (QUESTIONS, CHOICES) so sets made elsewhere score the same
way. Every question has exactly one right answer, derivable from the `scene` stored in its json:
a `color` question's shape occurs once in the scene, a `shape` question's colour once; a `position`
object lies wholly on one side of the vertical midline; an `exists` "no" pair is absent; a
`direction` mover is the only object of its colour and shape. Answers are balanced per type (type
and answer cycle with the sample index), so a question-only model stays near chance.

Conversations (`--vqa-turns N`): a vqa_image_train record asks up to N questions about its picture,
stored as `turns` in its json (fusion-data vqa's conversation format): the balanced question first
(also at the json's top level), then one question of each other type that has exactly one right
answer in the scene, in random order, none about a colour-shape pair an earlier turn already
spelled out (so no answer can be read off the conversation). Test sets keep one question per record.

Extra colours (`--extra-colors white,pink,...`): distractor objects in the training splits' scenes
(text, image, vqa_image_train) may also wear EXTRA_COLORS, and captions name them; no question or
answer does, and test scenes never show them. Every shape is then seen in more colours.

Compositional generalisation: three colour-shape pairs (distinct colours, distinct shapes, chosen
from the seed) never occur in text, image, video or any VQA train/test split, in captions or scenes;
`vqa_image_compositional` asks about exactly those pairs.

Determinism: sample i of split S depends only on `random.Random(f"{seed}-{S}-{i}")` and the settings,
never on generation order or worker count; PNG (zlib) and H.264 (x264, one thread) encoding are
deterministic, and ShardWriter writes byte-identical tars, so the same seed and flags give
byte-identical shards.

Scene metadata (`scene` in the json): a list of {shape, color, x, y, size} with x, y the centre in
pixels (origin top-left, y down, pixel centres at i + 0.5) and `size` the radius: a circle has radius
`size`, a triangle (pointing up) is inscribed in the circle of radius `size`, a square has half-side
SQUARE_HALF * size. Videos add an `event`: {kind: move, index, direction, x1, y1} (the object moves
linearly from (x, y) at frame 0 to (x1, y1) at the last frame), {kind: appear, index, frame} (the
object is absent before `frame`), or {kind: change, index, color, frame} (it has the new colour from
`frame` on).
"""

from fusion.data.tokenizer_train import UNKNOWN_WORD, WORD_PATTERN, word_level_tokenizer
from fusion.data.toy.generator import (
    add_toy_arguments,
    check_image_size,
    format_summary,
    generate_toy,
    run_toy,
)
from fusion.data.toy.language import (
    FACTS,
    describe_event,
    describe_scene,
    join,
    make_event,
    make_image_question,
    make_motion,
    qa_text,
    question_pair,
    scene_question,
    where,
)
from fusion.data.toy.scenes import (
    PlacementError,
    encode_mp4,
    encode_png,
    object_at,
    place_scene,
    render_image,
    render_video,
    shape_mask,
    side_of,
    video_meta,
)
from fusion.data.toy.splits import (
    SPLITS,
    SPLITS_BY_NAME,
    STATS_SOURCE,
    TOKENIZER_FILE,
    VIDEO_SPLITS,
    Split,
    check_toy_output,
    compositional_answers,
    count_types,
    cycle,
    image_sample,
    sample_key,
    text_sample,
    text_words,
    video_sample,
    vqa_image_sample,
    vqa_video_sample,
    write_toy_shard,
    write_toy_tokenizer,
)
from fusion.data.toy.world import (
    BACKGROUND,
    CAPTION_BAND,
    CHOICES,
    CLEARANCE,
    COLOR_NAMES,
    COLORS,
    COUNT_WORDS,
    CRF,
    DEFAULTS,
    DIRECTIONS,
    EXTRA_COLORS,
    FPS,
    GOP,
    IMAGE_TYPES,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    MIN_TRAVEL,
    N_HELD_OUT,
    PAIRS,
    POSITION_MARGIN,
    QUESTIONS,
    RGB,
    SHAPES,
    SIZE_RANGE,
    SQUARE_HALF,
    VIDEO_EVENTS,
    VIDEO_TYPES,
    World,
    article,
    choose_held_out,
    named,
)

__all__ = [
    "UNKNOWN_WORD",
    "WORD_PATTERN",
    "word_level_tokenizer",
    "BACKGROUND",
    "CAPTION_BAND",
    "CHOICES",
    "CLEARANCE",
    "COLORS",
    "COLOR_NAMES",
    "COUNT_WORDS",
    "CRF",
    "DEFAULTS",
    "DIRECTIONS",
    "EXTRA_COLORS",
    "FACTS",
    "FPS",
    "GOP",
    "IMAGE_TYPES",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "MIN_TRAVEL",
    "N_HELD_OUT",
    "PAIRS",
    "POSITION_MARGIN",
    "PlacementError",
    "QUESTIONS",
    "RGB",
    "SHAPES",
    "SIZE_RANGE",
    "SPLITS",
    "SPLITS_BY_NAME",
    "SQUARE_HALF",
    "STATS_SOURCE",
    "Split",
    "TOKENIZER_FILE",
    "VIDEO_EVENTS",
    "VIDEO_SPLITS",
    "VIDEO_TYPES",
    "World",
    "add_toy_arguments",
    "article",
    "check_image_size",
    "check_toy_output",
    "choose_held_out",
    "compositional_answers",
    "count_types",
    "cycle",
    "describe_event",
    "describe_scene",
    "encode_mp4",
    "encode_png",
    "format_summary",
    "generate_toy",
    "image_sample",
    "join",
    "make_event",
    "make_image_question",
    "make_motion",
    "named",
    "object_at",
    "place_scene",
    "qa_text",
    "question_pair",
    "render_image",
    "render_video",
    "run_toy",
    "sample_key",
    "scene_question",
    "shape_mask",
    "side_of",
    "text_sample",
    "text_words",
    "video_meta",
    "video_sample",
    "vqa_image_sample",
    "vqa_video_sample",
    "where",
    "write_toy_shard",
    "write_toy_tokenizer",
]
