"""Alembic migrations of the catalogue schema, run by `tspace_core.catalogue.engine.migrate`.

To change the schema: edit models.py, then autogenerate a revision against a database at head,
review it, and `ruff format` it:

    from alembic import command
    from tspace_core.catalogue.engine import alembic_config, make_engine, upgrade
    engine = make_engine("sqlite:////tmp/schema.db"); upgrade(engine)
    with engine.begin() as c:
        command.revision(alembic_config(c), message="...", autogenerate=True, rev_id="0002")

The contract test fails while the models and the migrations disagree.
"""
