# Per failed test of a libtest log: its name, the panic message's first line, and
# for a daemon that refused to start its final error and the verifier's complaint.
function flush() {
    if (name != "") {
        printf "  %s: %s\n", name, substr(msg, 1, 200)
        if (err != "") printf "      %s\n", substr(err, 1, 200)
        if (ver != "") printf "      verifier: %s\n", substr(ver, 1, 200)
    }
    name = ""; msg = ""; err = ""; ver = ""; prev = ""
}
/ panicked at / {
    flush()
    name = $0; sub(/^thread '/, "", name); sub(/'.*/, "", name)
    getline msg
    next
}
/^---- / { flush() }
name != "" && err == "" && /^flowd-rs: / { err = $0 }
name != "" && ver == "" && /^processed [0-9]+ insns/ { ver = prev }
{ prev = $0 }
END { flush() }
