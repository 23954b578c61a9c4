-- Run once by the postgres image on an empty data directory: a separate
-- database for the MLflow basic-auth user store next to the tracking store
-- (database "mlflow", created from POSTGRES_DB).
CREATE DATABASE mlflow_auth;
