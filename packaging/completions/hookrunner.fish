# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_hookrunner_global_optspecs
    string join \n h/help V/version
end

function __fish_hookrunner_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_hookrunner_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_hookrunner_using_subcommand
    set -l cmd (__fish_hookrunner_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c hookrunner -n "__fish_hookrunner_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hookrunner -n "__fish_hookrunner_needs_command" -s V -l version -d 'Print version'
complete -c hookrunner -n "__fish_hookrunner_needs_command" -f -a "serve" -d 'Run the daemon'
complete -c hookrunner -n "__fish_hookrunner_needs_command" -f -a "check" -d 'Validate the configuration and routes, print the routing table'
complete -c hookrunner -n "__fish_hookrunner_needs_command" -f -a "deliveries" -d 'List, show, retry or drop deliveries in the store (works while the daemon runs)'
complete -c hookrunner -n "__fish_hookrunner_needs_command" -f -a "get" -d 'Print values from a payload file (a script\'s $1) at the paths routes use'
complete -c hookrunner -n "__fish_hookrunner_needs_command" -f -a "send" -d 'Post a realistic sample event, authenticated as a sender profile would be'
complete -c hookrunner -n "__fish_hookrunner_needs_command" -f -a "completions" -d 'Print the completion script for a shell'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand serve" -l config -d 'Configuration file (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand serve" -l scripts-dir -d 'Where scripts live, overriding the file (default /etc/hookrunner.d)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand serve" -l listen -d 'HOST:PORT or unix:/path, overriding the file (port 0 picks a free port; the log says which)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand check" -l config -d 'Configuration file (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand check" -l scripts-dir -d 'Where scripts live, overriding the file (default /etc/hookrunner.d)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand check" -l payload -d 'Explain what would happen to a POST of this body, instead of printing the routing table' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand check" -l header -d 'With --payload: a request header, \'Name: value\' (repeatable)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand check" -l path -d 'With --payload: the request\'s path and query' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand check" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -l config -d 'Configuration file, to find the store as `serve` does: it must parse, but only its store keys are used (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -l event -d 'Only events matching this glob (`*`, `?`; ignoring case)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -l status -d 'queued, running, done, failed, dead, or an exit code' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -l sender -d 'Only those from this sender' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -l since -d 'Only those received within this long (30s, 5m, 1h)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -l limit -d 'At most this many rows (default 50)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -l json -d 'Print the rows as a JSON array'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -f -a "list" -d 'List deliveries, newest first (by the time each came), and a summary line (the default command)'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -f -a "show" -d 'Show one delivery: its metadata and every attempt with its exit, duration and output tail'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -f -a "retry" -d 'Queue an async delivery to run now (a dead or done one gets one more attempt)'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and not __fish_seen_subcommand_from list show retry drop" -f -a "drop" -d 'Remove a delivery that is not running (with no daemon on the store, also one a crash left running)'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from list" -l event -d 'Only events matching this glob (`*`, `?`; ignoring case)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from list" -l status -d 'queued, running, done, failed, dead, or an exit code' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from list" -l sender -d 'Only those from this sender' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from list" -l since -d 'Only those received within this long (30s, 5m, 1h)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from list" -l limit -d 'At most this many rows (default 50)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from list" -l config -d 'Configuration file, to find the store as `serve` does: it must parse, but only its store keys are used (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from list" -l json -d 'Print the rows as a JSON array'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from show" -l config -d 'Configuration file, to find the store as `serve` does: it must parse, but only its store keys are used (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from show" -l payload -d 'Print the payload (the body as received) instead'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from retry" -l event -d 'With --dead: only those of events matching this glob' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from retry" -l config -d 'Configuration file, to find the store as `serve` does: it must parse, but only its store keys are used (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from retry" -l dead -d 'Every dead delivery instead'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from retry" -s h -l help -d 'Print help'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from drop" -l config -d 'Configuration file, to find the store as `serve` does: it must parse, but only its store keys are used (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand deliveries; and __fish_seen_subcommand_from drop" -s h -l help -d 'Print help'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand get" -l default -d 'Print this for a path that is not there, instead of failing' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand get" -l format -d 'The body\'s format, whatever HOOKRUNNER_CONTENT_TYPE says (without it: that variable, else the body\'s first character)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand get" -l json -d 'Print each value as JSON (objects and arrays whole)'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand get" -l shell -d 'Print NAME=\'value\' lines to eval in a shell script'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand get" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l url -d 'Where to post: http://HOST:PORT/path, https://HOST:PORT/path or unix:/path/to/socket (default: the configuration\'s listen, at the sender\'s path; https when it has [tls]). Without a path of its own, the sender\'s' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l cacert -d 'For https: the CA certificates to trust (PEM), checked with the URL\'s host name (default: the configuration\'s [tls] cert_file, trusted as the daemon\'s own certificate)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l cert -d 'For https: a client certificate to present (PEM, with its chain), as Jamf Pro\'s Mutual TLS does for an mtls sender (which needs one)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l key -d 'The client certificate\'s private key (PEM)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l format -d 'Jamf\'s body shape' -r -f -a "json\t''
xml\t''"
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l sender -d 'Authenticate as this [[sender]] profile of the configuration' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l set -d 'Set a field of the sample before sending, e.g. --set /event/deviceName=Lab-01 (repeatable)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l count -d 'How many to send' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l rate -d 'How fast, in requests per second (e.g. 5/s)' -r
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l config -d 'Configuration file (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)' -r -F
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -l list -d 'List the samples'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand send" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hookrunner -n "__fish_hookrunner_using_subcommand completions" -s h -l help -d 'Print help (see more with \'--help\')'
