"""Stage 3, the configuration: the YAML reader (``yaml_reader``: YAML 1.2 core schema, with
bounds), the file's model and loading (``loader``: built from the declarations' features), and
the configuration this process runs with (``active``).

May import: the engine, the site declarations and the shared leaves; pydantic and PyYAML. No
torch and no vLLM.
"""
