"""circuits labeler service: two-pass progressive LLM labelling of MLP neurons (relp-spec §H).

Modules: ``evidence`` (aggregated edges / units from an atlas or Parquet export), ``projection``
(output projections of every neuron), ``prompts`` (layer bands, prompts, answer validation),
``llm`` (Anthropic / OpenAI-compatible backends, retries, budget), ``cache`` (persistent answer
cache), ``store`` (labels JSONL), ``engine`` (the progressive run), ``service`` / ``servicer`` /
``server`` (gRPC), ``testing`` (a stand-in LLM HTTP server for tests and benchmarks).
"""
