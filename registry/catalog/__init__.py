"""Where SAEs are recorded: the database (:mod:`.db`, :mod:`.migrate`), its schema
(:mod:`.schema`, :mod:`.feature_schema`), reads (:mod:`.queries`), the only writer
(:mod:`.writes`), the MLflow mirror and the content-addressed artifact store."""
