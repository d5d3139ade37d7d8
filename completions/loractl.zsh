#compdef loractl

_loractl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _LORACTL_COMPLETE=complete_zsh loractl)
}

compdef _loractl_completion loractl
