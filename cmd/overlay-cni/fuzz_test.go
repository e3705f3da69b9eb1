package main

import (
	"errors"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// FuzzParseConf: any stdin gives a configuration or a CNI error, never a
// panic; an accepted one names a network and a socket.
func FuzzParseConf(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"overlay","type":"overlay-cni","network":"default"}`))
	f.Add([]byte(`{"name":"o","runtimeConfig":{"ips":["198.19.0.9/26"],"mac":"02:00:00:00:00:09"}}`))
	f.Add([]byte(`{"name":"o","ipam":{"type":"host-local"}}`))
	f.Add([]byte(`{"name":"o","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		conf, err := parseAll(data)
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) || e.Code == 0 {
				t.Fatalf("error without a CNI code: %v", err)
			}
			return
		}
		if conf.Network == "" || conf.Socket == "" {
			t.Fatalf("accepted a configuration without network or socket: %+v", conf)
		}
		if len(conf.RuntimeConfig.IPs) > 0 && !conf.ip.Is4() {
			t.Fatalf("accepted ips %q without an IPv4 address", conf.RuntimeConfig.IPs)
		}
	})
}

// FuzzParseArgs: any CNI_ARGS is accepted or refused with code 4.
func FuzzParseArgs(f *testing.F) {
	f.Add("IgnoreUnknown=1;K8S_POD_NAME=web")
	f.Add("K=V;")
	f.Add("=;==;IgnoreUnknown")
	f.Fuzz(func(t *testing.T, s string) {
		err := parseArgs(s)
		var e *types.Error
		if err != nil && (!errors.As(err, &e) || e.Code != types.ErrInvalidEnvironmentVariables) {
			t.Fatalf("parseArgs(%q) = %v, want nil or code 4", s, err)
		}
	})
}
