package main

import (
	"errors"
	"fmt"
	"testing"

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
