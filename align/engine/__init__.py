"""The torch generation engine: n completions per prompt from one prefill (sampling, decoding,
shared-prefix attention), model and tokenizer loading, and the sample record every engine returns."""
