"""Sweetspot's library, by role (no Ray, no DeepSpeed anywhere in it):

    align.math       pure tensor math: BoN laws, losses, DeRa mixing, reward transforms, selection,
                     draw kernels, statistics (imports torch and nothing else)
    align.engine     the torch generation engine and model I/O: sampling loop, decoding state,
                     shared-prefix attention, model/tokenizer loading, the sample record
    align.data       prompt sets and preference pairs
    align.rewards    reward kinds (a registry, one module per kind) and the scorers built from them
    align.objectives training objectives (a registry, one module per objective): the trainer's losses
    align.task       the embedded default task (a tiny GPT-2 pretrained on generated reviews)
    align.runtime    typed configs, output paths, run state on disk
"""
