"""Text awareness: incremental detokenization per sequence, stop strings, and the vocabularies
the service knows (`sampler_client.vocabulary` holds the Vocabulary itself, shared with the
SDK that registers one). Pure: no gRPC, no engine."""
