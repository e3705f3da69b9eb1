package main

import (
	"errors"
	"fmt"
	"maps"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/overlaynet/overlay/cnirpc"
)

func TestParseConf(t *testing.T) {
	conf, err := parseConf([]byte(`{"cniVersion":"1.1.0","name":"overlay","type":"overlay-cni","capabilities":{"portMappings":true}}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.Network != "overlay" || conf.Socket != cnirpc.DefaultSocket {
		t.Errorf("defaults: network %q socket %q", conf.Network, conf.Socket)
	}
	conf, err = parseConf([]byte(`{"cniVersion":"1.1.0","name":"overlay","network":"blue","socket":"/tmp/s"}`))
	if err != nil || conf.Network != "blue" || conf.Socket != "/tmp/s" {
		t.Errorf("explicit: %+v, %v", conf, err)
	}
	for in, code := range map[string]uint{
		`{`:                      types.ErrDecodingFailure,
		`[]`:                     types.ErrDecodingFailure,
		`{"cniVersion":"1.1.0"}`: types.ErrInvalidNetworkConfig,
		`{"name":7}`:             types.ErrDecodingFailure,
	} {
		_, err := parseConf([]byte(in))
		var e *types.Error
		if !errors.As(err, &e) || e.Code != code {
			t.Errorf("parseConf(%s) = %v, want code %d", in, err, code)
		}
	}
}

// parseAll parses a configuration as ADD does.
func parseAll(data []byte) (*NetConf, error) {
	conf, err := parseConf(data)
	if err != nil {
		return nil, err
	}
	return conf, parseRuntimeConfig(conf)
}

func TestParseConfRuntimeConfig(t *testing.T) {
	conf, err := parseAll([]byte(`{"cniVersion":"1.1.0","name":"overlay","runtimeConfig":{"ips":["198.19.0.9/26"],"mac":"02:00:00:00:00:09"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.ip.String() != "198.19.0.9" || conf.mac.String() != "02:00:00:00:00:09" {
		t.Fatalf("ip %s mac %s", conf.ip, conf.mac)
	}
	if conf, err := parseAll([]byte(`{"name":"overlay","runtimeConfig":{"ips":["198.19.0.9"]}}`)); err != nil || conf.ip.String() != "198.19.0.9" {
		t.Fatalf("bare address: %v", err)
	}
	for in, key := range map[string]string{
		`{"name":"o","ipam":{"type":"host-local"}}`:                               "ipam",
		`{"name":"o","runtimeConfig":{"ips":["198.19.0.9/26","198.19.0.10/26"]}}`: "runtimeConfig.ips",
		`{"name":"o","runtimeConfig":{"ips":["2001:db8::1/64"]}}`:                 "runtimeConfig.ips",
		`{"name":"o","runtimeConfig":{"ips":["nonsense"]}}`:                       "runtimeConfig.ips",
		`{"name":"o","runtimeConfig":{"mac":"01:00:5e:00:00:01"}}`:                "runtimeConfig.mac",
		`{"name":"o","runtimeConfig":{"mac":"zz"}}`:                               "runtimeConfig.mac",
	} {
		_, err := parseAll([]byte(in))
		var e *types.Error
		if !errors.As(err, &e) || e.Code != types.ErrUnsupportedField || e.Msg != key {
			t.Errorf("parseAll(%s) = %v, want code 2 naming %s", in, err, key)
		}
	}
}

// TestParseLabels: endpoint labels come from args.cni.labels (CNI
// conventions: a list of key and value) and runtimeConfig.labels (the
// same, or an object), the latter winning; bad ones are code 7 naming
// where they came from.
func TestParseLabels(t *testing.T) {
	conf, err := parseAll([]byte(`{"name":"o",
		"args":{"cni":{"labels":[{"key":"app","value":"web"},{"key":"tier","value":"back"},{"key":"tier","value":"front"}]}},
		"runtimeConfig":{"labels":{"app":"api","team":"net"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"app": "api", "tier": "front", "team": "net"}
	if !maps.Equal(conf.labels, want) {
		t.Fatalf("labels %v; want %v", conf.labels, want)
	}
	if r := request(conf, &skel.CmdArgs{ContainerID: "c", IfName: "eth0"}); !maps.Equal(r.Labels, want) {
		t.Fatalf("request carries labels %v; want %v", r.Labels, want)
	}
	if conf, err := parseAll([]byte(`{"name":"o","runtimeConfig":{"labels":[{"key":"k","value":""}]}}`)); err != nil || conf.labels["k"] != "" || len(conf.labels) != 1 {
		t.Fatalf("a list in runtimeConfig: %v, %v", conf, err)
	}
	if conf, err := parseAll([]byte(`{"name":"o"}`)); err != nil || conf.labels != nil {
		t.Fatalf("no labels: %v, %v", conf.labels, err)
	}
	for in, key := range map[string]string{
		`{"name":"o","args":{"cni":{"labels":{"k":1}}}}`:          "args.cni.labels",
		`{"name":"o","args":{"cni":{"labels":[{"value":"v"}]}}}`:  "args.cni.labels",
		`{"name":"o","runtimeConfig":{"labels":"app=web"}}`:       "runtimeConfig.labels",
		`{"name":"o","runtimeConfig":{"labels":{"bad key":"v"}}}`: "endpoint labels",
		`{"name":"o","runtimeConfig":{"labels":{"k":"` + strings.Repeat("v", 1000) + `","l":"` + strings.Repeat("v", 1000) + `","m":"` + strings.Repeat("v", 1000) + `","n":"` + strings.Repeat("v", 1000) + `","o":"` + strings.Repeat("v", 1000) + `"}}}`: "endpoint labels",
	} {
		_, err := parseAll([]byte(in))
		var e *types.Error
		if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || e.Msg != key {
			t.Errorf("parseAll(%.80s) = %v, want code 7 naming %s", in, err, key)
		}
	}
	for _, in := range []string{
		`{"name":"o","args":{"cni":{"labels":42}},"runtimeConfig":{"labels":7}}`,
		`{"name":"o","args":[]}`,
		`{"name":"o","args":{"cni":"x"}}`,
	} {
		if _, err := parseConf([]byte(in)); err != nil {
			t.Errorf("parseConf (DEL's parsing) of %s refused args or labels it does not need: %v", in, err)
		}
	}
	if _, err := parseAll([]byte(`{"name":"o","args":[]}`)); err == nil {
		t.Error("ADD took args that are not an object")
	}
}

func TestDelIgnoresBadRuntimeConfig(t *testing.T) {
	if _, err := parseConf([]byte(`{"name":"o","runtimeConfig":{"ips":["nonsense"],"mac":"zz"}}`)); err != nil {
		t.Fatalf("parseConf (DEL's parsing) refused a runtimeConfig it does not need: %v", err)
	}
}

func TestParseArgs(t *testing.T) {
	for _, ok := range []string{"", "IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=default", "IgnoreUnknown=true"} {
		if err := parseArgs(ok); err != nil {
			t.Errorf("parseArgs(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"K8S_POD_NAME=web", "IgnoreUnknown=1;novalue", "IgnoreUnknown=maybe"} {
		var e *types.Error
		if err := parseArgs(bad); !errors.As(err, &e) || e.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(e.Msg, "CNI_ARGS") {
			t.Errorf("parseArgs(%q) = %v, want code 4 naming CNI_ARGS", bad, err)
		}
	}
}

func TestRPCError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code uint
	}{
		{fmt.Errorf("dial: %w", cnirpc.ErrUnavailable), types.ErrTryAgainLater},
		{&cnirpc.Error{Code: cnirpc.CodeNoAddress, Msg: "full"}, cnirpc.CodeNoAddress},
		{errors.New("strange"), types.ErrInternal},
	} {
		var e *types.Error
		if err := rpcError("add", tc.err); !errors.As(err, &e) || e.Code != tc.code {
			t.Errorf("rpcError(%v) = %v, want code %d", tc.err, err, tc.code)
		}
	}
}
