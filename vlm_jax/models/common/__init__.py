"""What the model families share: layers and how they run (`layers`), the decoder's attention cores
(`attention`), the one decoder layer body (`decoder`), the model interface the trainer and sampler
use (`model`), vision pieces (`vision`). A family sub-package adds only what differs."""
