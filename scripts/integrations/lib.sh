# shellcheck source-path=SCRIPTDIR
# Shared by the integration scripts beside this file; sourced, not run. POSIX sh.
#
# Settings come from one env file: integrations.env beside the scripts if there is one, else
# /etc/hookrunner/integrations.env (integrations.env.example lists every setting). hookrunner clears the
# environment of the scripts it runs, so that file is the only place settings come from.

set -eu

INTEGRATIONS_DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
if [ -f "$INTEGRATIONS_DIR/integrations.env" ]; then
    # shellcheck source=integrations.env.example
    . "$INTEGRATIONS_DIR/integrations.env"
elif [ -f /etc/hookrunner/integrations.env ]; then
    # shellcheck source=integrations.env.example
    . /etc/hookrunner/integrations.env
fi

PAYLOAD=${1:?usage: $0 PAYLOAD_FILE (hookrunner runs this script with the request body)}
HR=${HOOKRUNNER_BIN:-hookrunner}
# For the scripts that source this file.
# shellcheck disable=SC2034
EVENT=${HOOKRUNNER_EVENT:-}
# shellcheck disable=SC2034
REQUEST_ID=${HOOKRUNNER_REQUEST_ID:-}
STATE_DIR=${STATE_DIR:-/var/lib/hookrunner}

# field PATH...: the first of these paths that has a value in the payload (JSON or XML), else "". A payload
# that is neither ends the script with get's 65 (EX_DATAERR): on an async route it is dead at once, since
# no retry can mend it.
field() {
    for path in "$@"; do
        value=$("$HR" get --default '' "$PAYLOAD" "$path") || return
        if [ -n "$value" ]; then
            printf '%s' "$value"
            return 0
        fi
    done
}

# json TEXT: TEXT as a JSON string, quotes included.
json() {
    printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' \
        -e 's/\t/\\t/g' -e 's/\r/\\r/g' | awk 'BEGIN { printf "\"" } NR > 1 { printf "\\n" } { printf "%s", $0 } END { printf "\"" }'
}

# one_line TEXT: TEXT with its line breaks made spaces (a value that must not start a line of its own).
one_line() {
    printf '%s' "$1" | tr '\r\n' '  '
}

# slack TEXT: TEXT as Slack shows it literally: `&`, `<` and `>` escaped, so that a device name cannot
# mention @channel or disguise a link (`<!channel>`, `<https://...|Open in Jamf Pro>`).
slack() {
    printf '%s' "$1" | sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g'
}

# curl_value TEXT: TEXT inside double quotes in a curl config (`url = "..."`): `\` and `"` escaped, and
# no line break, which would end the option.
curl_value() {
    printf '%s' "$1" | tr -d '\r\n' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'
}

# post_json URL BODY: POSTs BODY as JSON. The URL goes to curl on its standard input, never on its
# command line, because a webhook URL is a secret and a command line is visible to every user. A failure
# returns 1 (retried on an async route; curl's own code could be 65, which would not be), curl's message
# on stderr.
post_json() {
    body_file=$(mktemp)
    printf '%s' "$2" > "$body_file"
    status=0
    printf 'url = "%s"\n' "$(curl_value "$1")" | curl --config - --silent --show-error --fail --max-time 20 \
        --proto '=http,https' --header 'Content-Type: application/json' --data-binary "@$body_file" \
        --output /dev/null || status=1
    rm -f "$body_file"
    return "$status"
}

# chat TEXT: a plain message to the Slack and/or Teams webhook configured. Both are tried; it fails if
# either did.
chat() {
    if [ -z "${SLACK_WEBHOOK_URL:-}" ] && [ -z "${TEAMS_WEBHOOK_URL:-}" ]; then
        echo "set SLACK_WEBHOOK_URL or TEAMS_WEBHOOK_URL in integrations.env" >&2
        return 1
    fi
    failed=0
    if [ -n "${SLACK_WEBHOOK_URL:-}" ]; then
        post_json "$SLACK_WEBHOOK_URL" "{\"text\":$(json "$(slack "$1")")}" || failed=1
    fi
    if [ -n "${TEAMS_WEBHOOK_URL:-}" ]; then
        post_json "$TEAMS_WEBHOOK_URL" "$(teams_card "$(json "$1")" '' '[]' '')" || failed=1
    fi
    return "$failed"
}

# teams_card TITLE_JSON SUBTITLE_JSON FACTS_JSON LINK: a Teams workflow message holding one Adaptive Card.
teams_card() {
    actions='[]'
    if [ -n "$4" ]; then
        actions="[{\"type\":\"Action.OpenUrl\",\"title\":\"Open in Jamf Pro\",\"url\":$(json "$4")}]"
    fi
    subtitle=''
    if [ -n "$2" ]; then
        subtitle=",{\"type\":\"TextBlock\",\"text\":$2,\"isSubtle\":true,\"wrap\":true}"
    fi
    # "$schema" is the card's own key, not a shell expansion.
    # shellcheck disable=SC2016
    printf '{"type":"message","attachments":[{"contentType":"application/vnd.microsoft.card.adaptive","content":{"$schema":"http://adaptivecards.io/schemas/adaptive-card.json","type":"AdaptiveCard","version":"1.4","body":[{"type":"TextBlock","text":%s,"weight":"Bolder","size":"Medium","wrap":true}%s,{"type":"FactSet","facts":%s}],"actions":%s}}]}' \
        "$1" "$subtitle" "$3" "$actions"
}
