#!/bin/sh
# Entrypoint of the ternarylm MLflow server image (cluster/mlflow/Dockerfile).
#
# `mlflow server --app-name basic-auth` reads its user store settings from an
# INI file. Its database_uri has no environment override, and the URI holds
# the database password, so the file is rendered here at start-up from the
# environment into a private temporary directory instead of being committed
# or baked into the image. Then the container command (`mlflow server ...`)
# is exec'd.
#
# Environment:
#   MLFLOW_AUTH_DATABASE_URI     user store, e.g. postgresql://<user>:<password>@<host>:5432/mlflow_auth (required)
#   MLFLOW_AUTH_ADMIN_PASSWORD   admin password, read by MLflow itself on first start (required)
#   MLFLOW_AUTH_ADMIN_USERNAME   admin user name (default: admin)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  permission of users on resources they did not create (default: READ)
set -eu

: "${MLFLOW_AUTH_DATABASE_URI:?MLFLOW_AUTH_DATABASE_URI must be set (user store of basic-auth)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH_ADMIN_PASSWORD must be set (MLflow ships no default admin password)}"

umask 077
conf_dir="$(mktemp -d)"
# configparser treats % as interpolation: escape it (URL-encoded passwords).
db_uri="$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')"
cat > "$conf_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${db_uri}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"

exec "$@"
