# Flattens the block-style YAML subset that controller/agent/guest/seed.py writes into
# one "dotted.path=value" line per scalar, so /init can read the seed with
# busybox ash + awk instead of a YAML library:
#
#   ethernets:                    ethernets.eth0.match.macaddress=02:aa:bb:cc:dd:ee
#     eth0:                 =>    ethernets.eth0.addresses.0=10.1.2.2/24
#       match: {macaddress}       mounts.0.1=/data
#
# Supported: mappings, block sequences (indented or not, nested "- - x",
# "- key: v" items), flow sequences of plain scalars ("[a, b]"), single and
# double quoted scalars, "#" comments on their own line. Not supported (never
# written by seed.py): anchors, multi-line scalars, flow mappings.

function unquote(v) {
	if (v ~ /^'.*'$/) {
		v = substr(v, 2, length(v) - 2)
		gsub(/''/, "'", v)
	} else if (v ~ /^".*"$/) {
		v = substr(v, 2, length(v) - 2)
		gsub(/\\"/, "\"", v)
		gsub(/\\\\/, "\\", v)
	}
	return v
}

function join(prefix, key) {
	return prefix == "" ? key : prefix "." key
}

# Emits a scalar, or each element of a flow sequence, under path p.
function emit(p, v,    n, i, items) {
	if (v ~ /^\[.*\]$/) {
		v = substr(v, 2, length(v) - 2)
		if (v ~ /^ *$/) return
		n = split(v, items, /, */)
		for (i = 1; i <= n; i++) {
			sub(/^ +/, "", items[i]); sub(/ +$/, "", items[i])
			print join(p, i - 1) "=" unquote(items[i])
		}
		return
	}
	print p "=" unquote(v)
}

# Frame stack: ind[d] = indent of the line that opened it, isitem[d] = sequence
# item or mapping key, path[d], cnt[d] = next index for items owned by it.
function push(i, item, p) {
	depth++
	ind[depth] = i; isitem[depth] = item; path[depth] = p; cnt[depth] = 0
}

# A "key: value" or "key:" at indent i (the current top is its parent).
function keyline(i, s,    k, v) {
	while (depth > 0 && ind[depth] >= i) depth--
	k = s; v = ""
	if (match(s, /: /)) {
		k = substr(s, 1, RSTART - 1)
		v = substr(s, RSTART + 2)
	} else {
		sub(/:$/, "", k)
	}
	sub(/^ +/, "", v); sub(/ +$/, "", v)
	k = unquote(k)
	if (v == "") push(i, 0, join(path[depth], k))
	else emit(join(path[depth], k), v)
}

# A "- ..." at indent i: a new element of the innermost open sequence owner.
function itemline(i, s,    p) {
	while (depth > 0 && (ind[depth] > i || (ind[depth] == i && isitem[depth]))) depth--
	p = join(path[depth], cnt[depth]++)
	push(i, 1, p)
	s = substr(s, 3)
	sub(/^ +/, "", s)
	if (s ~ /^- /) itemline(i + 2, s)
	else if (s ~ /^[^'"[][^:]*:( |$)/) keyline(i + 2, s)
	else if (s != "") emit(p, s)
}

BEGIN { depth = 0; ind[0] = -1; isitem[0] = 0; path[0] = ""; cnt[0] = 0 }

/^[ \t]*(#|$)/ { next }
/^---/ { next }

{
	line = $0
	sub(/[ \t\r]+$/, "", line)
	match(line, /^ */)
	i = RLENGTH
	s = substr(line, i + 1)
	if (s ~ /^- / || s == "-") itemline(i, s == "-" ? "- " : s)
	else keyline(i, s)
}
