package gossip

import (
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/overlaynet/overlay/overlay"
)

func TestMetaRoundTrip(t *testing.T) {
	m := overlay.Member{
		Host:     "host-a",
		Underlay: netip.MustParseAddr("198.18.0.1"),
		VTEPMAC:  net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01},
	}
	b, err := encodeMeta(m)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"v":1,"h":"host-a","u":"198.18.0.1","m":"02:00:00:00:00:01"}`
	if string(b) != want {
		t.Errorf("encodeMeta:\n got %s\nwant %s", b, want)
	}
	got, err := decodeMeta(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, m) {
		t.Errorf("decodeMeta(encodeMeta(m)) = %+v, want %+v", got, m)
	}
}

func TestDecodeMetaRejects(t *testing.T) {
	const (
		v = `"v":1`
		h = `"h":"host-a"`
		u = `"u":"198.18.0.1"`
		m = `"m":"02:00:00:00:00:01"`
	)
	obj := func(fields ...string) string { return "{" + strings.Join(fields, ",") + "}" }
	tests := []struct {
		name string
		meta string
	}{
		{"empty", ``},
		{"garbage", "\x00\xffnot json"},
		{"not an object", `[1,2]`},
		{"no version", obj(h, u, m)},
		{"unknown version", obj(`"v":2`, h, u, m)},
		{"version not a number", obj(`"v":"1"`, h, u, m)},
		{"unknown field", obj(v, h, u, m, `"x":1`)},
		{"trailing data", obj(v, h, u, m) + `{}`},
		{"empty host", obj(v, `"h":""`, u, m)},
		{"no underlay", obj(v, h, m)},
		{"bad underlay", obj(v, h, `"u":"198.18.0.256"`, m)},
		{"underlay with zone", obj(v, h, `"u":"fe80::1%eth0"`, m)},
		{"bad MAC", obj(v, h, u, `"m":"02:00:00:00:00"`)},
		{"EUI-64 MAC", obj(v, h, u, `"m":"02:00:00:00:00:00:00:01"`)},
		{"old blocks not JSON", obj(v, h, u, m, `"b":{default:["198.19.0.0/26"]}`)},
		{"old blocks unterminated", `{"v":1,"h":"host-a","u":"198.18.0.1","m":"02:00:00:00:00:01","b":{"default":[`},
		{"unknown field with old blocks", obj(v, h, u, m, `"b":{}`, `"x":1`)},
		{"bad underlay with old blocks", obj(v, h, `"u":"198.18.0.256"`, m, `"b":{"default":["198.19.0.0/26"]}`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := decodeMeta([]byte(tt.meta))
			if !errors.Is(err, errBadMeta) {
				t.Fatalf("decodeMeta(%q) = %+v, %v; want an error wrapping errBadMeta", tt.meta, got, err)
			}
		})
	}
}

func TestDecodeMetaNormalizes(t *testing.T) {
	meta := `{"v":1,"h":"host-a","u":"198.18.0.1","m":"02-00-00-00-00-01"}`
	got, err := decodeMeta([]byte(meta))
	if err != nil {
		t.Fatal(err)
	}
	want := overlay.Member{
		Host:     "host-a",
		Underlay: netip.MustParseAddr("198.18.0.1"),
		VTEPMAC:  net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("decodeMeta = %+v, want %+v", got, want)
	}
}

// TestDecodeMetaIgnoresOldBlocks: metadata of the previous release, which
// gossiped its blocks in "b", is accepted during a rolling upgrade and its
// blocks ignored, whatever JSON they are; and it is never written again.
func TestDecodeMetaIgnoresOldBlocks(t *testing.T) {
	const prefix = `{"v":1,"h":"host-a","u":"198.18.0.1","m":"02:00:00:00:00:01",`
	want := overlay.Member{
		Host:     "host-a",
		Underlay: netip.MustParseAddr("198.18.0.1"),
		VTEPMAC:  net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01},
	}
	for _, b := range []string{
		// As the previous release wrote it.
		`{"default":["198.19.0.0/26","198.19.0.64/26"],"blue":["10.1.0.0/24"]}`,
		// What it would have refused, which is no reason to refuse a live
		// host now.
		`{"default":["198.19.0.1/26"]}`,
		`{"default":["198.19.0.0/26","198.19.0.0/26"]}`,
		`{"":["198.19.0.0/26"]}`,
		`{"default":["not a prefix"]}`,
		`["198.19.0.0/26"]`,
		`{}`,
		`null`,
		`7`,
	} {
		meta := prefix + `"b":` + b + `}`
		got, err := decodeMeta([]byte(meta))
		if err != nil {
			t.Errorf("decodeMeta(%s) = %v, want it accepted", meta, err)
			continue
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("decodeMeta(%s) = %+v, want %+v", meta, got, want)
		}
		enc, err := encodeMeta(got)
		if err != nil {
			t.Fatal(err)
		}
		if want := `{"v":1,"h":"host-a","u":"198.18.0.1","m":"02:00:00:00:00:01"}`; string(enc) != want {
			t.Errorf("re-encoded %s as %s, want %s", meta, enc, want)
		}
	}
}

func FuzzDecodeMeta(f *testing.F) {
	f.Add([]byte(`{"v":1,"h":"host-a","u":"198.18.0.1","m":"02:00:00:00:00:01","b":{"default":["198.19.0.0/26"]}}`))
	f.Add([]byte(`{"v":1,"h":"h","u":"2001:db8::1","m":"02:00:00:00:00:01","b":{"a":["2001:db8::/64","10.0.0.0/8"],"b":[]}}`))
	f.Add([]byte(`{"v":1,"h":"h","u":"::ffff:1.2.3.4","m":"0200.0000.0001"}`))
	f.Add([]byte(`{"v":2}`))
	f.Add([]byte(`{"v":1,"h":"h","u":"1.2.3.4","m":"02:00:00:00:00:01","b":{"x":["1.2.3.4/24"]}}`))
	f.Add([]byte("\xff\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMeta(b)
		if err != nil {
			if !errors.Is(err, errBadMeta) {
				t.Fatalf("decodeMeta error %v does not wrap errBadMeta", err)
			}
			return
		}
		if m.Host == "" || !m.Underlay.Is4() || len(m.VTEPMAC) != macLen {
			t.Fatalf("decodeMeta accepted an invalid member %+v", m)
		}
		enc, err := encodeMeta(m)
		if err != nil {
			t.Fatalf("encodeMeta(%+v): %v", m, err)
		}
		var fields map[string]json.RawMessage
		if err := json.Unmarshal(enc, &fields); err != nil {
			t.Fatalf("encodeMeta wrote %s, not a JSON object: %v", enc, err)
		}
		if _, ok := fields["b"]; ok {
			t.Fatalf("encodeMeta wrote blocks: %s", enc)
		}
		m2, err := decodeMeta(enc)
		if err != nil {
			t.Fatalf("decodeMeta(encodeMeta(%+v)) = %v; encoding %s", m, err, enc)
		}
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("round trip changed the member:\n got %+v\nwant %+v", m2, m)
		}
		enc2, err := encodeMeta(m2)
		if err != nil || string(enc2) != string(enc) {
			t.Fatalf("encodeMeta is not deterministic: %s then %s (%v)", enc, enc2, err)
		}
	})
}
