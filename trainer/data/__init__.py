"""Data: audio -> utterances -> features -> batches, and the embedded corpus they are made from.

- ``sources``: manifests, Lhotse cuts and shards, Hugging Face sets -> ``Utterance`` rows, bad rows named
- ``audio``, ``text``: waveforms read at 16 kHz; the text normaliser and the sentencepiece tokenizer
- ``effects``, ``augment``: waveform effects (noise, room, telephone, tempo) and their draws in training
- ``features``: log-mel, frame stacking, SpecAugment, speed perturbation, on the loader or the device
- ``batches``: ``SpeechDataset``, length-bucketed batches of a frame budget, the loader
- ``corpus``: the embedded corpus and its out-of-domain suite

May import ``trainer.config`` and ``trainer.runtime``; never ``trainer.model`` nor the run's modules above.
"""
